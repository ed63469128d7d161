"""A site's personalised ANNs: each trained from the final global model on the site's own rows, never sent.

| name | method | module |
|---|---|---|
| ``finetune`` | global-then-local fine-tuning of all layers | :mod:`client.personalised.finetune` |
| ``ditto`` | personal model pulled toward the global one (Li et al., ICML 2021) | :mod:`client.personalised.ditto` |
| ``fedper`` | global body, heads trained at the site (Arivazhagan et al. 2019) | :mod:`client.personalised.fedper` |
| ``mix`` | global and local-only predictions mixed (APFL, Deng et al. 2020) | :mod:`client.personalised.mix` |

With the local-only model (:mod:`client.personalised.local`) and the global model, they are the candidates a
site chooses among on its validation split (:mod:`client.personalised.choice`). Personalised boosting (the
federation's trees plus trees grown at the site, ``site-trees``) is :mod:`client.personalised.site_trees`, a
candidate of ``query.personalise_boosting`` with the site's local-only and the global boosters.
:mod:`client.personalised.candidates` makes a site's candidates for a plan. This package's ``__init__`` imports
nothing, so the choice (:mod:`client.personalised.choice`) is read without torch.
"""
