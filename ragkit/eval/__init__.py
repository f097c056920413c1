"""Evaluation: metrics (retrieval now; QA metrics and tasks come with `ragkit eval`)."""
