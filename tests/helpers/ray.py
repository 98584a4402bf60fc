"""The test session's local Ray (conftest's `ray_session`, and what multi-node drills restore)."""

from __future__ import annotations


def init_local_ray() -> None:
    """The session's local Ray (also what the multi-node drills restore afterwards)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh local Ray, even if a `ray start` cluster runs
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            namespace="qywx-test",
            configure_logging=False,
        )
