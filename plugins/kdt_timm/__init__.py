"""Backbones from timm, as a kdtoolkit plugin bundle."""
