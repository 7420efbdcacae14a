"""The wire contract: `softprompt.proto` (package softprompt.v1), its generated stubs, and the conversions of
the types both sides share (`enums`: finish reasons and training states; `options`: DecodingOptions and
TrainingOptions, through `mapping`, which derives dataclass <-> message copies from the dataclass's fields).

Imports only protobuf, grpc and the torch-free `softprompt.prompts` modules.
"""
