"""Sender authentication: SPF, DKIM, ARC, DMARC and the Authentication-Results header."""
