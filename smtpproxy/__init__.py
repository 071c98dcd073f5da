"""smtpproxy: an inbound SMTP filtering proxy in front of an existing mail server."""

__version__ = "0.1.0"
