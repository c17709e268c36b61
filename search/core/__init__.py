"""The base utilities every stage uses: user-facing errors, atomic writes, progress bars and the runtime (device, DDP)."""
