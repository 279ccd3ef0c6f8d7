"""What a model is trained to do: the task kinds (:class:`fedsim.tasks.base.Task`).

A task kind says what a model's output is for a dataset's labels, which
per-example loss trains it by default and which per-example metrics evaluate
it: single-label ``classification``, ``next_token`` prediction over sequences,
``multilabel`` tag prediction, ``binary`` classification and ``regression``,
one file each. A dataset names its kind (:attr:`fedsim.data.base.FederatedData.task`);
a user's kind is a subclass of :class:`fedsim.tasks.base.Task`.
"""
