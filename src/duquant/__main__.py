"""`python -m duquant ...` and the `duquant` console script (what `torchrun --nproc-per-node N -m
duquant run ...` starts on each rank)."""

import os
import sys


def entry() -> int:
    """Run the command line; under a multi-process launch, torch's C++ rendezvous and socket
    logging (a stack trace per retry) is kept down to fatal errors unless asked for, since every
    failure to join or exchange is reported as one line (set TORCH_CPP_LOG_LEVEL to see it)."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    from duquant.cli import main  # after the environment: torch reads it when loaded

    return main()


if __name__ == "__main__":
    sys.exit(entry())
