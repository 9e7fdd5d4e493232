"""smtpguard: a transparent SMTP proxy that enforces SMTP command order."""

__version__ = "0.1.0"
