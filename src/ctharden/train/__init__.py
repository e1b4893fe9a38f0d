"""Training: baseline supervised training with k-fold CV (this issue), later adaptive/IMA/adversarial."""
