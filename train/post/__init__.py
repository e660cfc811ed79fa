"""`python -m train.post`: the post-training data builders (data/post/) with their backends, our own model among them."""
