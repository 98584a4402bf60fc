"""Pydantic models of WeCom kf messages, events, callbacks and sync_msg pages.

Every message and event type WeCom documents has a model; unknown types and unknown
fields are KEPT (extra="allow", a generic model for an unknown msgtype or event_type),
never dropped: `parse_kf_message(d).model_dump() == d`. Parsing never calls out.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class Origin(IntEnum):
    CUSTOMER = 3
    SYSTEM_EVENT = 4
    SERVICER = 5


class _Open(BaseModel):
    """Keeps unknown fields; dumps only what was given (by alias) so dicts round-trip."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("exclude_unset", True)
        kwargs.setdefault("by_alias", True)
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("exclude_unset", True)
        kwargs.setdefault("by_alias", True)
        return super().model_dump_json(**kwargs)


# ---------------------------------------------------------------- message payloads
class TextContent(_Open):
    content: str = ""
    menu_id: str | None = None


class MediaContent(_Open):
    media_id: str = ""


class LocationContent(_Open):
    latitude: float | None = None
    longitude: float | None = None
    name: str | None = None
    address: str | None = None


class LinkContent(_Open):
    title: str | None = None
    desc: str | None = None
    url: str | None = None
    pic_url: str | None = None


class BusinessCardContent(_Open):
    userid: str | None = None


class MiniprogramContent(_Open):
    title: str | None = None
    appid: str | None = None
    pagepath: str | None = None
    thumb_media_id: str | None = None


class MsgMenuContent(_Open):
    head_content: str | None = None
    menu_list: list[dict[str, Any]] | None = Field(default=None, alias="list")
    tail_content: str | None = None


class ChannelsShopProductContent(_Open):
    product_id: str | None = None
    head_image: str | None = None
    title: str | None = None
    sales_price: str | None = None
    shop_nickname: str | None = None
    shop_head_image: str | None = None


class ChannelsShopOrderContent(_Open):
    order_id: str | None = None
    product_titles: str | None = None
    price_wording: str | None = None
    state: str | None = None
    image_url: str | None = None
    shop_nickname: str | None = None


class MergedMsgItem(_Open):
    send_time: int | None = None
    msgtype: str | None = None
    sender_name: str | None = None
    msg_content: str | None = None


class MergedMsgContent(_Open):
    title: str | None = None
    item: list[MergedMsgItem] | None = None


class ChannelsContent(_Open):
    sub_type: int | None = None
    nickname: str | None = None
    title: str | None = None


class MeetingContent(_Open):
    meetingid: str | None = None


class ScheduleContent(_Open):
    scheduleid: str | None = None


class NoteContent(_Open):
    pass


# ---------------------------------------------------------------------- events
class KfEventBase(_Open):
    event_type: str
    open_kfid: str | None = None
    external_userid: str | None = None


class WechatChannels(_Open):
    nickname: str | None = None
    scene: int | None = None
    shop_nickname: str | None = None


class EnterSessionEvent(KfEventBase):
    event_type: Literal["enter_session"] = "enter_session"
    scene: str | None = None
    scene_param: str | None = None
    welcome_code: str | None = None
    wechat_channels: WechatChannels | None = None


class MsgSendFailEvent(KfEventBase):
    event_type: Literal["msg_send_fail"] = "msg_send_fail"
    fail_msgid: str | None = None
    fail_type: int | None = None


class ServicerStatusChangeEvent(KfEventBase):
    event_type: Literal["servicer_status_change"] = "servicer_status_change"
    servicer_userid: str | None = None
    status: int | None = None
    stop_type: int | None = None


class SessionStatusChangeEvent(KfEventBase):
    event_type: Literal["session_status_change"] = "session_status_change"
    change_type: int | None = None
    old_servicer_userid: str | None = None
    new_servicer_userid: str | None = None
    msg_code: str | None = None


class UserRecallMsgEvent(KfEventBase):
    event_type: Literal["user_recall_msg"] = "user_recall_msg"
    recall_msgid: str | None = None


class ServicerRecallMsgEvent(KfEventBase):
    event_type: Literal["servicer_recall_msg"] = "servicer_recall_msg"
    recall_msgid: str | None = None
    servicer_userid: str | None = None


class RejectCustomerMsgSwitchChangeEvent(KfEventBase):
    event_type: Literal["reject_customer_msg_switch_change"] = "reject_customer_msg_switch_change"
    servicer_userid: str | None = None
    reject_switch: int | None = None


class UnknownEvent(KfEventBase):
    """An event_type this code does not know yet; every field is kept."""


_EVENT_TYPES: dict[str, type[KfEventBase]] = {
    "enter_session": EnterSessionEvent,
    "msg_send_fail": MsgSendFailEvent,
    "servicer_status_change": ServicerStatusChangeEvent,
    "session_status_change": SessionStatusChangeEvent,
    "user_recall_msg": UserRecallMsgEvent,
    "servicer_recall_msg": ServicerRecallMsgEvent,
    "reject_customer_msg_switch_change": RejectCustomerMsgSwitchChangeEvent,
}


def _event_tag(value: Any) -> str:
    et = value.get("event_type") if isinstance(value, dict) else getattr(value, "event_type", "")
    return et if et in _EVENT_TYPES else "unknown"


KfEvent = Annotated[
    Annotated[EnterSessionEvent, Tag("enter_session")]
    | Annotated[MsgSendFailEvent, Tag("msg_send_fail")]
    | Annotated[ServicerStatusChangeEvent, Tag("servicer_status_change")]
    | Annotated[SessionStatusChangeEvent, Tag("session_status_change")]
    | Annotated[UserRecallMsgEvent, Tag("user_recall_msg")]
    | Annotated[ServicerRecallMsgEvent, Tag("servicer_recall_msg")]
    | Annotated[RejectCustomerMsgSwitchChangeEvent, Tag("reject_customer_msg_switch_change")]
    | Annotated[UnknownEvent, Tag("unknown")],
    Discriminator(_event_tag),
]


# -------------------------------------------------------------------- messages
class KfMessage(_Open):
    """One kf/sync_msg item. `open_kfid`/`external_userid` are normalised (events too)."""

    msgtype_name: ClassVar[str] = ""

    msgid: str
    msgtype: str
    send_time: int | None = None
    origin: Origin | int | None = Field(default=None, union_mode="left_to_right")
    servicer_userid: str | None = None
    raw_open_kfid: str | None = Field(default=None, alias="open_kfid")
    raw_external_userid: str | None = Field(default=None, alias="external_userid")

    def _event_field(self, name: str) -> str | None:
        event = getattr(self, "event", None)
        if isinstance(event, KfEventBase):
            value = getattr(event, name, None)
            return value if isinstance(value, str) else None
        if isinstance(event, dict):
            value = event.get(name)
            return value if isinstance(value, str) else None
        return None

    @property
    def open_kfid(self) -> str:
        return self.raw_open_kfid or self._event_field("open_kfid") or ""

    @property
    def external_userid(self) -> str:
        return self.raw_external_userid or self._event_field("external_userid") or ""

    @property
    def is_event(self) -> bool:
        return self.msgtype == "event"


class TextMessage(KfMessage):
    msgtype: Literal["text"] = "text"
    text: TextContent | None = None


class ImageMessage(KfMessage):
    msgtype: Literal["image"] = "image"
    image: MediaContent | None = None


class VoiceMessage(KfMessage):
    msgtype: Literal["voice"] = "voice"
    voice: MediaContent | None = None


class VideoMessage(KfMessage):
    msgtype: Literal["video"] = "video"
    video: MediaContent | None = None


class FileMessage(KfMessage):
    msgtype: Literal["file"] = "file"
    file: MediaContent | None = None


class LocationMessage(KfMessage):
    msgtype: Literal["location"] = "location"
    location: LocationContent | None = None


class LinkMessage(KfMessage):
    msgtype: Literal["link"] = "link"
    link: LinkContent | None = None


class BusinessCardMessage(KfMessage):
    msgtype: Literal["business_card"] = "business_card"
    business_card: BusinessCardContent | None = None


class MiniprogramMessage(KfMessage):
    msgtype: Literal["miniprogram"] = "miniprogram"
    miniprogram: MiniprogramContent | None = None


class MsgMenuMessage(KfMessage):
    msgtype: Literal["msgmenu"] = "msgmenu"
    msgmenu: MsgMenuContent | None = None


class ChannelsShopProductMessage(KfMessage):
    msgtype: Literal["channels_shop_product"] = "channels_shop_product"
    channels_shop_product: ChannelsShopProductContent | None = None


class ChannelsShopOrderMessage(KfMessage):
    msgtype: Literal["channels_shop_order"] = "channels_shop_order"
    channels_shop_order: ChannelsShopOrderContent | None = None


class MergedMsgMessage(KfMessage):
    msgtype: Literal["merged_msg"] = "merged_msg"
    merged_msg: MergedMsgContent | None = None


class ChannelsMessage(KfMessage):
    msgtype: Literal["channels"] = "channels"
    channels: ChannelsContent | None = None


class MeetingMessage(KfMessage):
    msgtype: Literal["meeting"] = "meeting"
    meeting: MeetingContent | None = None


class ScheduleMessage(KfMessage):
    msgtype: Literal["schedule"] = "schedule"
    schedule: ScheduleContent | None = None


class NoteMessage(KfMessage):
    msgtype: Literal["note"] = "note"
    note: NoteContent | None = None


class EventMessage(KfMessage):
    msgtype: Literal["event"] = "event"
    event: KfEvent | None = None

    @property
    def event_type(self) -> str:
        return self.event.event_type if self.event is not None else ""


class UnknownMessage(KfMessage):
    """A msgtype this code does not know yet; every field is kept."""


MESSAGE_TYPES: dict[str, type[KfMessage]] = {
    "text": TextMessage,
    "image": ImageMessage,
    "voice": VoiceMessage,
    "video": VideoMessage,
    "file": FileMessage,
    "location": LocationMessage,
    "link": LinkMessage,
    "business_card": BusinessCardMessage,
    "miniprogram": MiniprogramMessage,
    "msgmenu": MsgMenuMessage,
    "channels_shop_product": ChannelsShopProductMessage,
    "channels_shop_order": ChannelsShopOrderMessage,
    "merged_msg": MergedMsgMessage,
    "channels": ChannelsMessage,
    "meeting": MeetingMessage,
    "schedule": ScheduleMessage,
    "note": NoteMessage,
    "event": EventMessage,
}
EVENT_TYPES: tuple[str, ...] = tuple(_EVENT_TYPES)


def parse_kf_message(data: dict[str, Any]) -> KfMessage:
    """One sync_msg item → its typed model (UnknownMessage for a new msgtype)."""
    cls = MESSAGE_TYPES.get(str(data.get("msgtype", "")), UnknownMessage)
    return cls.model_validate(data)


# ------------------------------------------------------------ callback and page
class KfCallbackEvent(_Open):
    """The decrypted inner XML of a kf_msg_or_event callback."""

    to_user_name: str = Field(alias="ToUserName")
    create_time: int = Field(alias="CreateTime")
    msg_type: Literal["event"] = Field(alias="MsgType")
    event: Literal["kf_msg_or_event"] = Field(alias="Event")
    token: str = Field(alias="Token")
    open_kfid: str = Field(alias="OpenKfId")

    def __repr__(self) -> str:  # the sync token is a credential: keep it out of logs
        return f"KfCallbackEvent(open_kfid={self.open_kfid!r}, create_time={self.create_time})"

    __str__ = __repr__


class SyncMsgPage(_Open):
    """One kf/sync_msg response page; `has_more` may be true with an empty msg_list."""

    errcode: int = 0
    errmsg: str = "ok"
    next_cursor: str = ""
    has_more: bool = False
    msg_list: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def from_response(cls, data: dict[str, Any]) -> SyncMsgPage:
        """model_validate(data) without rebuilding up to 1,000 message dicts: a page whose
        msg_list is a list of dicts keeps that very list (the syncer envelopes each message
        as pulled); anything else is validated whole, with pydantic's error."""
        msg_list = data.get("msg_list")
        if type(msg_list) is not list or not all(type(m) is dict for m in msg_list):
            return cls.model_validate(data)
        page = cls.model_validate({k: v for k, v in data.items() if k != "msg_list"})
        page.msg_list = msg_list
        return page

    def messages(self) -> list[KfMessage]:
        return [parse_kf_message(m) for m in self.msg_list]
