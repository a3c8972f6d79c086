"""Allow ``python -m brainseg`` (also what ``torchrun -m brainseg`` runs)."""

from brainseg.cli import main

if __name__ == "__main__":
    main()
