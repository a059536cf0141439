"""Training: the one loop behind train_full and train_lora (session, loop, finish, training) and
what it uses: checkpoints, LoRA, the memory plan, the trackers, and how a training stage starts."""
