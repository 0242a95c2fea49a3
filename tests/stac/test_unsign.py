"""Stored items never keep a SAS token, wherever the signed href sits in the item."""

import json

from gair_dataset.stac_catalog import unsign_item


def test_unsign_item_cleans_every_href_and_keeps_other_parameters():
    item = {"id": "x",
            "assets": {"B02": {"href": "https://a.example/b.tif?st=1&se=2&sp=r&sig=SECRET&x=1",
                               "alternate": {"s3": {"href": "https://c.example/d.tif?sig=SECRET&sv=2021"}}}},
            "links": [{"rel": "self", "href": "https://e.example/item?sig=SECRET"}],
            "properties": {"note": "text?sig=kept: not a URL", "preview": "https://f.example/p.png?sig=SECRET&w=2"}}
    out = unsign_item(item)
    assert "SECRET" not in json.dumps(out["assets"]) + json.dumps(out["links"])
    assert out["assets"]["B02"]["href"] == "https://a.example/b.tif?x=1"
    assert out["assets"]["B02"]["alternate"]["s3"]["href"] == "https://c.example/d.tif"
    assert out["properties"] == {"note": "text?sig=kept: not a URL", "preview": "https://f.example/p.png?w=2"}
    assert "SECRET" in item["assets"]["B02"]["href"]  # the input is left alone: a copy
