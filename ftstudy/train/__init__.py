"""Training: the one loop behind train_full and train_lora (session, loop, finish, training), its loss-
free parts (checkpoints, LoRA, memory plan, trackers) and how a training stage is launched."""
