"""Trees of ``shared.hist_boosting`` written as an XGBoost JSON model, so ``xgboost.Booster`` loads them.

The layout is XGBoost's own JSON model schema (``doc/model.schema`` in the XGBoost repository, "Introduction
to Model IO", https://xgboost.readthedocs.io/en/stable/tutorials/saving_model.html), as XGBoost 3.2 writes
it: a ``gbtree`` booster whose trees hold parallel node arrays (``left_children``, ``right_children``,
``parents``, ``split_indices``, ``split_conditions`` — the threshold of a split, the shrunk leaf value of a
leaf —, ``default_left``, ``base_weights``, ``loss_changes``, ``sum_hessian``). A row goes left when
``x < split_condition``, which is the learner's own rule (``bin <= split_bin``), so the loaded booster
predicts what the learner predicts. ``loss_changes`` and ``sum_hessian`` make XGBoost's "gain" and "cover"
feature importances work. Softmax models list ``num_class`` trees per round (``tree_info`` = class).
"""

from __future__ import annotations

import json

from shared.hist_boosting import LEAF, Tree

XGBOOST_VERSION = [3, 2, 0]
ROOT_PARENT = 2147483647
"""XGBoost's parent of the root (``kInvalidNodeId`` as unsigned)."""


def export_model(rounds: list[list[Tree]], objective: str, base_score: float, n_features: int,
                 feature_names: list[str] | None = None) -> bytes:
    """XGBoost JSON bytes of ``rounds`` (each a list of one tree per output)."""
    n_outputs = len(rounds[0]) if rounds else 1
    trees, tree_info = [], []
    for trees_of_round in rounds:
        for k, tree in enumerate(trees_of_round):
            trees.append(tree_json(tree, len(trees), n_features))
            tree_info.append(k)
    softmax = objective == "multi:softprob"
    learner = {
        "attributes": {},
        "feature_names": list(feature_names or []),
        "feature_types": ["float"] * len(feature_names or []),
        "gradient_booster": {
            "model": {
                "cats": {"enc": [], "feature_segments": [], "sorted_idx": []},
                "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(len(trees))},
                "iteration_indptr": [i * n_outputs for i in range(len(rounds) + 1)],
                "tree_info": tree_info,
                "trees": trees,
            },
            "name": "gbtree",
        },
        "learner_model_param": {
            "base_score": "[" + ",".join([repr(float(base_score))] * (n_outputs if softmax else 1)) + "]",
            "boost_from_average": "0",
            "num_class": str(n_outputs if softmax else 0),
            "num_feature": str(n_features),
            "num_target": "1",
        },
        "objective": objective_json(objective, n_outputs),
    }
    return json.dumps({"learner": learner, "version": XGBOOST_VERSION}).encode()


def objective_json(objective: str, n_outputs: int) -> dict:
    """The ``objective`` block XGBoost writes for each objective."""
    if objective == "binary:logistic":
        return {"name": objective, "reg_loss_param": {"scale_pos_weight": "1"}}
    if objective == "reg:squarederror":
        return {"name": objective, "reg_loss_param": {"scale_pos_weight": "1"}}
    if objective == "multi:softprob":
        return {"name": objective, "softmax_multiclass_param": {"num_class": str(n_outputs)}}
    raise ValueError(f"export_model: objective {objective!r} has no XGBoost JSON form here")


def reachable_nodes(tree: Tree) -> list[int]:
    """The nodes reachable from the root, breadth first (pruned subtrees are left out)."""
    order, queue = [], [0]
    while queue:
        node = queue.pop(0)
        order.append(node)
        if tree.feature[node] != LEAF:
            queue += [tree.left[node], tree.right[node]]
    return order


def tree_json(tree: Tree, tree_id: int, n_features: int) -> dict:
    """One tree in XGBoost's JSON node arrays, nodes renumbered breadth first."""
    order = reachable_nodes(tree)
    new_id = {old: new for new, old in enumerate(order)}
    left, right, parents, split_indices, conditions = [], [], [], [], []
    for old in order:
        is_leaf = tree.feature[old] == LEAF
        left.append(LEAF if is_leaf else new_id[tree.left[old]])
        right.append(LEAF if is_leaf else new_id[tree.right[old]])
        parents.append(ROOT_PARENT if old == 0 else new_id[tree.parent[old]])
        split_indices.append(0 if is_leaf else tree.feature[old])
        conditions.append(tree.leaf_value[old] if is_leaf else tree.threshold[old])
    n = len(order)
    return {
        "base_weights": [tree.weight[old] for old in order],
        "categories": [], "categories_nodes": [], "categories_segments": [], "categories_sizes": [],
        "default_left": [0] * n,
        "id": tree_id,
        "left_children": left,
        "loss_changes": [tree.gain[old] for old in order],
        "parents": parents,
        "right_children": right,
        "split_conditions": conditions,
        "split_indices": split_indices,
        "split_type": [0] * n,
        "sum_hessian": [tree.hessian[old] for old in order],
        "tree_param": {"num_deleted": "0", "num_feature": str(n_features), "num_nodes": str(n),
                       "size_leaf_vector": "1"},
    }
