"""smtpproxy: an inbound SMTP filtering proxy in front of an existing mail server."""

__version__ = "0.2.0"
