"""Limits: token buckets today; daily quotas and concurrency leases come next."""

from extauthz.limits.bucket import RateLimiter, TokenBucket

__all__ = ["RateLimiter", "TokenBucket"]
