"""What GPTModel holds and where: the one description of its parameters (names, shapes, how each
is split over the folding), sharding full weights onto ranks and back, and checkpoints."""
