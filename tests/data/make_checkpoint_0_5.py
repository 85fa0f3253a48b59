"""Writes tests/data/checkpoint_0_5: optimizer states saved by 0.5.2."""
import json, os, shutil
import jax, jax.numpy as jnp, numpy as np, optax
import orbax.checkpoint as ocp
from flax import serialization
import adahessian_optax as aho

def problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(11), 4)
  params = {"w1": jax.random.normal(k1, (4, 6)) * 0.5, "b1": jnp.zeros(6),
            "w2": jax.random.normal(k2, (6, 3)) * 0.5}
  x = jax.random.normal(k3, (16, 4)); y = jax.random.randint(k4, (16,), 0, 3)
  logits = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  return params, logits, y

def optimizers():
  params, logits, y = problem()
  return {"hutchinson": aho.adahessian(0.1, key=3, weight_decay=1e-3, update_interval=3, n_samples=2),
          "gnb": aho.adahessian(0.05, estimator=aho.gnb_estimator(key=4, n_samples=2))}

params0, logits, y = problem()
loss = aho.ggn(logits, aho.SoftmaxCrossEntropy(y))
out = "tests/data/checkpoint_0_5"
shutil.rmtree(out, ignore_errors=True); os.makedirs(out)
record = {}
for name, tx in optimizers().items():
  @jax.jit
  def step(params, state, tx=tx):
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state
  p, s = params0, tx.init(params0)
  for _ in range(4):
    p, s = step(p, s)
  with open(f"{out}/{name}.msgpack", "wb") as f:
    f.write(serialization.to_bytes({"params": p, "opt_state": s}))
  with ocp.StandardCheckpointer() as c:
    c.save(os.path.abspath(f"{out}/{name}_orbax"), {"params": p, "opt_state": s})
    c.wait_until_finished()
  for _ in range(3):
    p, s = step(p, s)
  record[name] = jax.tree.map(lambda a: np.asarray(a).tolist(), p)
with open(f"{out}/after_7_steps.json", "w") as f:
  json.dump(record, f)
print(jax.tree.map(lambda a: a.shape, s))
