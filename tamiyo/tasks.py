"""Celery interface of policy training (queue `train`)."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(
    name="tamiyo.train_policy",
    queue="train",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=1200,
    time_limit=1500,
)
def train_policy_task(seed: int = 0, epochs: int | None = None) -> dict:
    from tamiyo.services import policy_train

    result = policy_train(seed=seed, epochs=epochs)
    logger.info("policy training finished", extra={"result": result})
    return result


__all__ = ["train_policy_task"]
