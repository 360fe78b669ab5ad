"""Training the generator: the data step, prompt formats, the training loop and evaluation."""
