from rest_framework.pagination import LimitOffsetPagination

from urza.errors import ApplicationError

MAX_OFFSET = 2**31 - 1


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    """`limit` capped at 500; an `offset` past what a database can address is a 400."""

    max_limit = 500

    def get_offset(self, request) -> int:
        offset = super().get_offset(request)
        if offset > MAX_OFFSET:
            raise ApplicationError(
                f"offset must be at most {MAX_OFFSET}", detail={"offset": ["too large"]}
            )
        return offset
