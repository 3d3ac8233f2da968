"""REST endpoints of the app (DRF): the caller's budget, the plans, a user's budget (staff)."""
