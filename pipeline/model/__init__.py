"""The U-Net and its checkpoints."""
