from keys import issue_key, verify_key


def test_issue_and_verify_on_every_backend(store):
    issued = issue_key(store, name="n", scopes=["secret:read"])
    assert verify_key(store, issued.plaintext).id == issued.record.id
    assert store.get(issued.record.id) == issued.record
