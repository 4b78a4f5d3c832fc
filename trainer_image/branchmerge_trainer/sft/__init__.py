"""SFT stage: data loading, chat templating, packing and the training loop."""
