"""ctharden: prove a CT classifier is robust to CT noise and adversarial noise before it ships."""

__version__ = "0.1.0"
