"""Dataset factories for kdtoolkit: scikit-learn digits and image folders."""
