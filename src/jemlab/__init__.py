"""jemlab: Joint Energy-Based Models (JEM, JEM++, EGC) for learning, reproducing and using."""

__version__ = "0.1.0"
