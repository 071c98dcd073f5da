"""Milter mode: the policy core served to an MTA (Postfix ``smtpd_milters``) over the milter protocol v6."""
