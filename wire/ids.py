"""Identifier types shared by every process.

Each kind of id is a distinct ``NewType`` over ``int`` so that a type checker
refuses to pass a chunk id where an inode id is expected.
"""

from typing import NewType

InodeId = NewType("InodeId", int)
ChunkId = NewType("ChunkId", int)
ChunkVersion = NewType("ChunkVersion", int)
MetaserverId = NewType("MetaserverId", int)
DataserverId = NewType("DataserverId", int)
ClientId = NewType("ClientId", int)
SequenceNumber = NewType("SequenceNumber", int)

ROOT_INODE = InodeId(1)
