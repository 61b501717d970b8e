import pytest


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray (2 CPUs) for every Ray test in this package: starting Ray costs
    ~15 s on the 2-core box, so it is started once."""
    ray = pytest.importorskip("ray")
    from tests.workers import evaluators

    # Test evaluators travel to the actors by value: the workers need not import tests/.
    ray.cloudpickle.register_pickle_by_value(evaluators)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()
