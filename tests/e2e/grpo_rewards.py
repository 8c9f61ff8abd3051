"""A reward of the test's own, in TRL's signature (grpo.rewards=[grpo_rewards:even_share]): the share of
even token ids in a completion. It varies between the random embedded model's completions, so the
advantages are not all zero and the adapter moves; the language and format rewards pay 0 on its noise."""


def even_share(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
