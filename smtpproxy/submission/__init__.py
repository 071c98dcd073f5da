"""Submission (RFC 6409): AUTH, the submission policy, outbound DKIM signing."""
