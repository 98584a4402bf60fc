"""Every kf message and event type parses, exposes normalised ids and round-trips."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qywx_ray.wecom import models as m

BASE = {
    "msgid": "from_msgid_4622416642169452483",
    "open_kfid": "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q",
    "external_userid": "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw",
    "send_time": 1615478585,
    "origin": 3,
    "servicer_userid": "Zhangsan",
}

PAYLOADS: dict[str, dict[str, Any]] = {
    "text": {"content": "你购买的物品已经发货，可点击链接查看物流状态", "menu_id": "101"},
    "image": {"media_id": "2iSLeVyqzk4eX0IB5kTi9Ljfa2rt9dwfq5WKRQ4Nvvgw"},
    "voice": {"media_id": "2iSLeVyqzk4eX0IB5kTi9Ljfa2rt9dwfq5WKRQ4Nvvgw"},
    "video": {"media_id": "2iSLeVyqzk4eX0IB5kTi9Ljfa2rt9dwfq5WKRQ4Nvvgw"},
    "file": {"media_id": "2iSLeVyqzk4eX0IB5kTi9Ljfa2rt9dwfq5WKRQ4Nvvgw"},
    "location": {
        "latitude": 23.106021881103501,
        "longitude": 113.320503234863,
        "name": "广州国际媒体港(广州市海珠区)",
        "address": "广东省广州市海珠区滨江东路",
    },
    "link": {"title": "TITLE", "desc": "DESC", "url": "URL", "pic_url": "PIC_URL"},
    "business_card": {"userid": "USERID"},
    "miniprogram": {
        "title": "TITLE",
        "appid": "APPID",
        "pagepath": "PAGE_PATH",
        "thumb_media_id": "THUMB",
    },
    "msgmenu": {
        "head_content": "您对本次服务是否满意呢? ",
        "list": [
            {"type": "click", "click": {"id": "101", "content": "满意"}},
            {"type": "view", "view": {"url": "https://work.weixin.qq.com", "content": "点击跳转"}},
            {
                "type": "miniprogram",
                "miniprogram": {"appid": "wx123", "pagepath": "pages/index", "content": "小程序"},
            },
            {"type": "text", "text": {"content": "纯文本", "no_newline": 0}},
        ],
        "tail_content": "欢迎再次光临",
    },
    "channels_shop_product": {
        "product_id": "10000013",
        "head_image": "https://x/1.jpg",
        "title": "商品",
        "sales_price": "100",
        "shop_nickname": "店铺",
        "shop_head_image": "https://x/2.jpg",
    },
    "channels_shop_order": {
        "order_id": "3705115058471208928",
        "product_titles": "a,b",
        "price_wording": "¥100",
        "state": "待发货",
        "image_url": "https://x/3.jpg",
        "shop_nickname": "店铺",
    },
    "merged_msg": {
        "title": "聊天记录",
        "item": [
            {
                "send_time": 1636340717,
                "msgtype": "text",
                "sender_name": "张三",
                "msg_content": '{"text":{"content":"hi"}}',
            }
        ],
    },
    "channels": {"sub_type": 1, "nickname": "视频号名称", "title": "视频号动态标题"},
    "meeting": {"meetingid": "hyXXXXXXXX"},
    "schedule": {"scheduleid": "xxxxxxxxxxx"},
    "note": {},
}

EVENTS: dict[str, dict[str, Any]] = {
    "enter_session": {
        "scene": "123",
        "scene_param": "abc",
        "welcome_code": "aaaaaa",
        "wechat_channels": {"nickname": "视频号", "scene": 1, "shop_nickname": "店"},
    },
    "msg_send_fail": {"fail_msgid": "FAIL_MSGID", "fail_type": 4},
    "servicer_status_change": {"servicer_userid": "SERVICER", "status": 1, "stop_type": 0},
    "session_status_change": {
        "change_type": 1,
        "old_servicer_userid": "OLD",
        "new_servicer_userid": "NEW",
        "msg_code": "MSG_CODE",
    },
    "user_recall_msg": {"recall_msgid": "RECALL_MSGID"},
    "servicer_recall_msg": {"recall_msgid": "RECALL_MSGID", "servicer_userid": "SERVICER"},
    "reject_customer_msg_switch_change": {"servicer_userid": "SERVICER", "reject_switch": 1},
}


def _msg(msgtype: str) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), "msgtype": msgtype, msgtype: copy.deepcopy(PAYLOADS[msgtype])}


def _event(event_type: str) -> dict[str, Any]:
    return {
        "msgid": "evt-1",
        "send_time": 1615478585,
        "origin": 4,
        "msgtype": "event",
        "event": {
            "event_type": event_type,
            "open_kfid": "wkEVENTKF",
            "external_userid": "wmEVENTUSER",
            **copy.deepcopy(EVENTS[event_type]),
        },
    }


@pytest.mark.parametrize("msgtype", sorted(PAYLOADS))
def test_every_message_type_parses_and_round_trips(msgtype: str) -> None:
    data = _msg(msgtype)
    msg = m.parse_kf_message(data)
    assert type(msg) is m.MESSAGE_TYPES[msgtype]
    assert msg.model_dump() == data
    assert msg.open_kfid == BASE["open_kfid"]
    assert msg.external_userid == BASE["external_userid"]
    assert msg.origin is m.Origin.CUSTOMER
    assert getattr(msg, msgtype) is not None


def test_typed_access_to_payloads() -> None:
    text = m.parse_kf_message(_msg("text"))
    assert isinstance(text, m.TextMessage)
    assert text.text is not None
    assert text.text.menu_id == "101"
    menu = m.parse_kf_message(_msg("msgmenu"))
    assert isinstance(menu, m.MsgMenuMessage)
    assert menu.msgmenu is not None
    assert menu.msgmenu.menu_list is not None
    assert len(menu.msgmenu.menu_list) == 4
    merged = m.parse_kf_message(_msg("merged_msg"))
    assert isinstance(merged, m.MergedMsgMessage)
    assert merged.merged_msg is not None
    assert merged.merged_msg.item is not None
    assert merged.merged_msg.item[0].sender_name == "张三"


@pytest.mark.parametrize("event_type", sorted(EVENTS))
def test_every_event_type_parses_with_ids_from_event(event_type: str) -> None:
    data = _event(event_type)
    msg = m.parse_kf_message(data)
    assert isinstance(msg, m.EventMessage)
    assert msg.event is not None
    assert type(msg.event).__name__ != "UnknownEvent"
    assert msg.event_type == event_type
    assert msg.open_kfid == "wkEVENTKF"
    assert msg.external_userid == "wmEVENTUSER"
    assert msg.origin is m.Origin.SYSTEM_EVENT
    assert msg.is_event
    assert msg.model_dump() == data


def test_enter_session_fields() -> None:
    msg = m.parse_kf_message(_event("enter_session"))
    assert isinstance(msg, m.EventMessage)
    assert isinstance(msg.event, m.EnterSessionEvent)
    assert msg.event.welcome_code == "aaaaaa"
    assert msg.event.wechat_channels is not None
    assert msg.event.wechat_channels.scene == 1
    fail = m.parse_kf_message(_event("msg_send_fail"))
    assert isinstance(fail, m.EventMessage)
    assert isinstance(fail.event, m.MsgSendFailEvent)
    assert (fail.event.fail_msgid, fail.event.fail_type) == ("FAIL_MSGID", 4)


def test_unknown_msgtype_and_fields_survive() -> None:
    data = {**BASE, "msgtype": "hologram", "hologram": {"frames": [1, 2, {"z": "深"}]}, "new": 1}
    msg = m.parse_kf_message(data)
    assert isinstance(msg, m.UnknownMessage)
    assert msg.model_dump() == data
    assert msg.model_extra is not None
    assert msg.model_extra["hologram"]["frames"][2] == {"z": "深"}
    known = _msg("text")
    known["text"]["future_field"] = {"a": 1}
    known["top_level_future"] = [1]
    assert m.parse_kf_message(known).model_dump() == known


def test_unknown_event_type_survives() -> None:
    data = {
        "msgid": "e",
        "msgtype": "event",
        "origin": 4,
        "event": {"event_type": "brand_new_event", "open_kfid": "wk1", "x": {"y": [1]}},
    }
    msg = m.parse_kf_message(data)
    assert isinstance(msg, m.EventMessage)
    assert isinstance(msg.event, m.UnknownEvent)
    assert msg.open_kfid == "wk1"
    assert msg.external_userid == ""
    assert msg.model_dump() == data


def test_unknown_origin_value_is_kept() -> None:
    data = {**_msg("text"), "origin": 9}
    msg = m.parse_kf_message(data)
    assert msg.origin == 9
    assert msg.model_dump() == data


def test_model_dump_json_round_trips() -> None:
    import json

    data = _msg("location")
    assert json.loads(m.parse_kf_message(data).model_dump_json()) == data


def test_callback_event_and_sync_page() -> None:
    cb = m.KfCallbackEvent.model_validate(
        {
            "ToUserName": "ww12345678910",
            "CreateTime": "1348831860",
            "MsgType": "event",
            "Event": "kf_msg_or_event",
            "Token": "ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR",
            "OpenKfId": "wkxxxxxxx",
        }
    )
    assert cb.open_kfid == "wkxxxxxxx"
    assert cb.create_time == 1348831860
    assert "ENCA" not in repr(cb)
    assert "ENCA" not in str(cb)
    page = m.SyncMsgPage.model_validate(
        {
            "errcode": 0,
            "errmsg": "ok",
            "next_cursor": "4gw7MepFLfgF2VC5npN",
            "has_more": 1,
            "msg_list": [_msg("text"), _event("enter_session")],
        }
    )
    assert page.has_more is True
    parsed = page.messages()
    assert [type(p) for p in parsed] == [m.TextMessage, m.EventMessage]
    empty = m.SyncMsgPage.model_validate({"errcode": 0, "next_cursor": "c", "has_more": 1})
    assert empty.has_more
    assert empty.msg_list == []


def test_every_documented_type_has_a_sample() -> None:
    assert set(PAYLOADS) | {"event"} == set(m.MESSAGE_TYPES)
    assert set(EVENTS) == set(m.EVENT_TYPES)
