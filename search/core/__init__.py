"""The bottom layer every stage uses: user-facing errors, atomic writes, progress bars, the runtime (device, DDP)
and the torch-free option values the command line lists (``choices``). It imports nothing else of the project."""
