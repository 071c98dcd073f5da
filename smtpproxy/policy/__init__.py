"""The transaction policy: one core that the proxy, ``check``, ``rules test`` and the milter drive."""

from smtpproxy.policy.core import FORWARD, Decision, Delivery, Policy, SessionPolicy, result_word

__all__ = ["FORWARD", "Decision", "Delivery", "Policy", "SessionPolicy", "result_word"]
