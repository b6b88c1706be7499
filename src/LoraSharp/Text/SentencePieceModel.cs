using Google.Protobuf;

namespace LoraSharp.Text;

/// <summary>The kind of a SentencePiece vocabulary entry (sentencepiece_model.proto, SentencePiece.Type).</summary>
public enum SentencePieceType
{
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

public sealed record SentencePiece(string Piece, float Score, SentencePieceType Type);

/// <summary>
/// The parts of a SentencePiece <c>.model</c> file (a serialized <c>ModelProto</c>) that encoding and decoding use:
/// the vocabulary, the model type, special ids, byte fallback and the normalizer flags. Fields are read by their
/// protobuf numbers; everything else is skipped.
/// </summary>
public sealed class SentencePieceModel
{
    public required IReadOnlyList<SentencePiece> Pieces { get; init; }
    /// <summary>1 unigram, 2 BPE, 3 word, 4 char (TrainerSpec.model_type; default unigram).</summary>
    public int ModelType { get; init; } = 1;
    public bool ByteFallback { get; init; }
    public bool TreatWhitespaceAsSuffix { get; init; }
    public int UnkId { get; init; }
    public int BosId { get; init; } = 1;
    public int EosId { get; init; } = 2;
    public int PadId { get; init; } = -1;
    /// <summary>What an unknown piece decodes to (default " ⁇ ").</summary>
    public string UnkSurface { get; init; } = " \u2047 ";
    public string NormalizerName { get; init; } = "";
    /// <summary>Length of the normalizer's precompiled character map; 0 for the "identity" rule (Llama's).</summary>
    public int PrecompiledCharsMapLength { get; init; }
    public bool AddDummyPrefix { get; init; } = true;
    public bool RemoveExtraWhitespaces { get; init; } = true;
    public bool EscapeWhitespaces { get; init; } = true;

    public static SentencePieceModel Load(string path)
    {
        if (!File.Exists(path))
            throw new LoraSharpException("SentencePiece model not found", path);
        return Parse(File.ReadAllBytes(path), path);
    }

    public static SentencePieceModel Parse(byte[] bytes, string source = "tokenizer.model")
    {
        try
        {
            var pieces = new List<SentencePiece>();
            var trainer = new Dictionary<int, object>();
            var normalizer = new Dictionary<int, object>();
            var input = new CodedInputStream(bytes);
            uint tag;
            while ((tag = input.ReadTag()) != 0)
            {
                switch (WireFormat.GetTagFieldNumber(tag))
                {
                    case 1: pieces.Add(ReadPiece(input.ReadBytes())); break;
                    case 2: ReadFields(input.ReadBytes(), trainer); break;
                    case 3: ReadFields(input.ReadBytes(), normalizer); break;
                    default: input.SkipLastField(); break;
                }
            }
            if (pieces.Count == 0)
                throw new LoraSharpException("no vocabulary pieces: not a SentencePiece model", source);

            T Get<T>(Dictionary<int, object> d, int field, T fallback) => d.TryGetValue(field, out var v) ? (T)v : fallback;
            return new SentencePieceModel
            {
                Pieces = pieces,
                ModelType = (int)Get(trainer, 3, 1L),
                TreatWhitespaceAsSuffix = Get(trainer, 24, 0L) != 0,
                ByteFallback = Get(trainer, 35, 0L) != 0,
                UnkId = (int)Get(trainer, 40, 0L),
                BosId = (int)Get(trainer, 41, 1L),
                EosId = (int)Get(trainer, 42, 2L),
                PadId = (int)Get(trainer, 43, -1L),
                UnkSurface = Get<ByteString?>(trainer, 44, null)?.ToStringUtf8() ?? " \u2047 ",
                NormalizerName = Get<ByteString?>(normalizer, 1, null)?.ToStringUtf8() ?? "",
                PrecompiledCharsMapLength = Get<ByteString?>(normalizer, 2, null)?.Length ?? 0,
                AddDummyPrefix = Get(normalizer, 3, 1L) != 0,
                RemoveExtraWhitespaces = Get(normalizer, 4, 1L) != 0,
                EscapeWhitespaces = Get(normalizer, 5, 1L) != 0,
            };
        }
        catch (InvalidProtocolBufferException e)
        {
            throw new LoraSharpException("not a valid SentencePiece model (protobuf): " + e.Message, source, inner: e);
        }
    }

    static SentencePiece ReadPiece(ByteString bytes)
    {
        var input = bytes.CreateCodedInput();
        string piece = "";
        float score = 0;
        var type = SentencePieceType.Normal;
        uint tag;
        while ((tag = input.ReadTag()) != 0)
        {
            switch (WireFormat.GetTagFieldNumber(tag))
            {
                case 1: piece = input.ReadString(); break;
                case 2: score = input.ReadFloat(); break;
                case 3: type = (SentencePieceType)input.ReadEnum(); break;
                default: input.SkipLastField(); break;
            }
        }
        return new SentencePiece(piece, score, type);
    }

    /// <summary>Scalar fields by number: varints as long, length-delimited as ByteString, fixed32 as float.</summary>
    static void ReadFields(ByteString bytes, Dictionary<int, object> into)
    {
        var input = bytes.CreateCodedInput();
        uint tag;
        while ((tag = input.ReadTag()) != 0)
        {
            int field = WireFormat.GetTagFieldNumber(tag);
            switch (WireFormat.GetTagWireType(tag))
            {
                case WireFormat.WireType.Varint: into[field] = input.ReadInt64(); break;
                case WireFormat.WireType.LengthDelimited: into[field] = input.ReadBytes(); break;
                case WireFormat.WireType.Fixed32: into[field] = input.ReadFloat(); break;
                default: input.SkipLastField(); break;
            }
        }
    }
}
