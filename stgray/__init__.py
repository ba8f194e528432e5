"""stgray: spatio-temporal graph transfer learning between cities (GPDiff, STGP) on Ray."""

__version__ = "0.1.0"
