"""masa: Matrix Atom Sharing."""
