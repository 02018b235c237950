"""Fine-tuning on Ray Train: tasks, methods, the training loop and export."""
