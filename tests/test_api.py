import trainplan
from trainplan.ir.plan import Plan


def test_library_plan_from_a_path_and_from_a_spec(repo):
    path = repo / "plans" / "laptop-gpt-tiny.yaml"
    from_path = trainplan.plan(path)
    from_spec = trainplan.plan(trainplan.load_spec(path))
    assert isinstance(from_path, Plan)
    assert from_path == from_spec
    assert from_path.mesh.world_size == 4 and from_path.spec.task.seq_len == 64  # the task resolved from the model
