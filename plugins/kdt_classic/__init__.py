"""Classic distillation components: a linear classification head, cross-entropy and Hinton KD."""
