"""`python -m train ...` runs the Hydra training app."""
from .main import main

main()
