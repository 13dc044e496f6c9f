"""MEM: multimodal unlearnable examples (image noise + caption trigger)."""
