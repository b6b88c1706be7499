using System.Text;

namespace LoraSharp.Text;

/// <summary>
/// SentencePiece BPE (the Llama 1/2, Mistral tokenizer.model) implemented from the model file, matching the
/// sentencepiece library: identity normalization with dummy prefix and "▁" for spaces, then merges of adjacent
/// symbols by highest piece score (ties: leftmost first), unknown characters as byte pieces (byte_fallback) or one
/// unk id per run, and decoding with the leading dummy space removed and unk shown as " ⁇ ".
/// Microsoft.ML.Tokenizers 2.0.1 was checked against the reference vectors and differs (no merging of unk runs,
/// unk decoded as "", a different tie order with byte_fallback), so it is not used here.
/// </summary>
public sealed class SentencePieceTokenizer : ITextTokenizer
{
    const char Space = '\u2581'; // ▁

    readonly SentencePieceModel _model;
    readonly Dictionary<string, int> _mergeable = new(StringComparer.Ordinal);   // normal, user-defined, unused
    readonly Dictionary<string, int> _all = new(StringComparer.Ordinal);
    readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _mergeableLookup;
    readonly string[] _userDefined;
    readonly int[] _byteIds = new int[256];
    readonly Dictionary<string, int> _specials;

    public SentencePieceTokenizer(SentencePieceModel model, IReadOnlyDictionary<string, int>? addedTokens = null)
    {
        if (model.ModelType != 2)
            throw new LoraSharpException($"SentencePiece model type {model.ModelType} is not supported (only BPE, type 2, as Llama uses)");
        if (model.TreatWhitespaceAsSuffix)
            throw new LoraSharpException("SentencePiece models with treat_whitespace_as_suffix are not supported");
        _model = model;
        Array.Fill(_byteIds, -1);
        for (int id = 0; id < model.Pieces.Count; id++)
        {
            var p = model.Pieces[id];
            _all.TryAdd(p.Piece, id);
            if (p.Type is SentencePieceType.Normal or SentencePieceType.UserDefined or SentencePieceType.Unused)
                _mergeable.TryAdd(p.Piece, id);
            if (p.Type == SentencePieceType.Byte && p.Piece.Length == 6 && p.Piece.StartsWith("<0x", StringComparison.Ordinal))
                _byteIds[Convert.ToInt32(p.Piece[3..5], 16)] = id;
        }
        _mergeableLookup = _mergeable.GetAlternateLookup<ReadOnlySpan<char>>();
        _userDefined = model.Pieces.Where(p => p.Type == SentencePieceType.UserDefined).Select(p => p.Piece)
            .OrderByDescending(p => p.Length).ToArray();
        _specials = model.Pieces.Select((p, id) => (p, id)).Where(x => x.p.Type == SentencePieceType.Control)
            .ToDictionary(x => x.p.Piece, x => x.id);
        foreach (var (text, id) in addedTokens ?? new Dictionary<string, int>())
            _specials[text] = id;
    }

    public static SentencePieceTokenizer Load(string path, IReadOnlyDictionary<string, int>? addedTokens = null) =>
        new(SentencePieceModel.Load(path), addedTokens);

    public SentencePieceModel Model => _model;
    public int VocabSize => _model.Pieces.Count;
    public int? BosId => _model.BosId >= 0 ? _model.BosId : null;
    public int? EosId => _model.EosId >= 0 ? _model.EosId : null;
    public int? PadId => _model.PadId >= 0 ? _model.PadId : null;
    public IReadOnlyDictionary<string, int> SpecialTokens => _specials;

    public int? TokenToId(string token) => _all.TryGetValue(token, out var id) ? id : null;

    public string IdToPiece(int id) => _model.Pieces[id].Piece;

    /// <summary>The normalized text: spaces as ▁, a leading ▁ when add_dummy_prefix, extra spaces removed when the model says so.</summary>
    public string Normalize(string text)
    {
        if (text.Length == 0) return "";
        if (_model.PrecompiledCharsMapLength > 0)
            text = text.Normalize(NormalizationForm.FormKC); // approximates nmt_nfkc; Llama models use "identity"
        var sb = new StringBuilder(text.Length + 1);
        if (_model.RemoveExtraWhitespaces)
        {
            text = text.Trim(' ');
            if (text.Length == 0) return "";
        }
        char spaceOut = _model.EscapeWhitespaces ? Space : ' ';
        if (_model.AddDummyPrefix) sb.Append(spaceOut);
        bool previousSpace = false;
        foreach (var c in text)
        {
            if (c == ' ')
            {
                if (_model.RemoveExtraWhitespaces && previousSpace) continue;
                sb.Append(spaceOut);
                previousSpace = true;
            }
            else
            {
                sb.Append(c);
                previousSpace = false;
            }
        }
        return sb.ToString();
    }

    public IReadOnlyList<int> Encode(string text, bool addBos = false, bool addEos = false) =>
        SpecialTokenSplitter.Encode(text, EncodeInto, BosId, EosId, addBos, addEos);

    public IReadOnlyList<int> EncodeWithSpecialTokens(string text, bool addBos = false, bool addEos = false) =>
        SpecialTokenSplitter.Encode(text, EncodeInto, BosId, EosId, addBos, addEos, _specials);

    /// <summary>Pieces of <paramref name="text"/> (after normalization), as the merges leave them, before id lookup.</summary>
    public IReadOnlyList<string> EncodeToPieces(string text) => MergeSymbols(Normalize(text));

    void EncodeInto(string text, List<int> ids)
    {
        bool previousUnk = false;
        foreach (var piece in MergeSymbols(Normalize(text)))
        {
            if (_all.TryGetValue(piece, out var id) && _model.Pieces[id].Type != SentencePieceType.Unknown)
            {
                ids.Add(id);
                previousUnk = false;
            }
            else if (_model.ByteFallback)
            {
                foreach (var b in Encoding.UTF8.GetBytes(piece))
                    ids.Add(_byteIds[b] >= 0 ? _byteIds[b] : _model.UnkId);
                previousUnk = false;
            }
            else
            {
                // A run of unknown pieces becomes one unk, as SentencePieceProcessor merges them.
                if (!previousUnk) ids.Add(_model.UnkId);
                previousUnk = true;
            }
        }
    }

    /// <summary>
    /// SentencePiece BPE: start from single characters (user-defined pieces kept whole), repeatedly merge the adjacent
    /// pair whose concatenation is a vocabulary piece with the highest score, leftmost first on ties.
    /// </summary>
    List<string> MergeSymbols(string normalized)
    {
        var result = new List<string>();
        if (normalized.Length == 0) return result;

        // Symbols as [start, length) spans of the normalized text, linked left/right.
        var starts = new List<int>();
        var lengths = new List<int>();
        for (int i = 0; i < normalized.Length;)
        {
            int len = 0;
            foreach (var u in _userDefined)
                if (string.CompareOrdinal(normalized, i, u, 0, u.Length) == 0) { len = u.Length; break; }
            if (len == 0) len = char.IsHighSurrogate(normalized[i]) && i + 1 < normalized.Length && char.IsLowSurrogate(normalized[i + 1]) ? 2 : 1;
            starts.Add(i);
            lengths.Add(len);
            i += len;
        }
        int n = starts.Count;
        var prev = new int[n];
        var next = new int[n];
        var len2 = lengths.ToArray();
        for (int i = 0; i < n; i++) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; }

        // Max-heap on score, then min on left position.
        var agenda = new PriorityQueue<(int Left, int Right, int Size), (float Score, int Left)>(
            Comparer<(float Score, int Left)>.Create((a, b) => a.Score != b.Score ? b.Score.CompareTo(a.Score) : a.Left.CompareTo(b.Left)));

        void TryAddPair(int left, int right)
        {
            if (left < 0 || right < 0) return;
            var span = normalized.AsSpan(starts[left], len2[left] + len2[right]);
            if (!_mergeableLookup.TryGetValue(span, out var id)) return;
            agenda.Enqueue((left, right, span.Length), (_model.Pieces[id].Score, left));
        }

        for (int i = 0; i + 1 < n; i++) TryAddPair(i, i + 1);

        while (agenda.TryDequeue(out var pair, out _))
        {
            // Skip pairs made stale by an earlier merge.
            if (len2[pair.Left] == 0 || len2[pair.Right] == 0 || next[pair.Left] != pair.Right || len2[pair.Left] + len2[pair.Right] != pair.Size)
                continue;
            len2[pair.Left] += len2[pair.Right];
            len2[pair.Right] = 0;
            next[pair.Left] = next[pair.Right];
            if (next[pair.Right] >= 0) prev[next[pair.Right]] = pair.Left;
            TryAddPair(prev[pair.Left], pair.Left);
            TryAddPair(pair.Left, next[pair.Left]);
        }

        for (int i = 0; i >= 0; i = next[i])
            result.Add(normalized.Substring(starts[i], len2[i]));
        return result;
    }

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        var text = new StringBuilder();
        var bytes = new List<byte>();
        bool atStart = true; // the leading dummy-prefix space is dropped until some text has been written

        void FlushBytes()
        {
            if (bytes.Count == 0) return;
            text.Append(Encoding.UTF8.GetString(bytes.ToArray()));
            bytes.Clear();
            if (text.Length > 0) atStart = false;
        }

        foreach (var id in ids)
        {
            if (id < 0 || id >= _model.Pieces.Count)
                throw new ArgumentOutOfRangeException(nameof(ids), id, $"token id outside the vocabulary (size {_model.Pieces.Count})");
            var p = _model.Pieces[id];
            if (p.Type == SentencePieceType.Byte)
            {
                bytes.Add(Convert.ToByte(p.Piece[3..5], 16));
                continue;
            }
            FlushBytes();
            string surface;
            if (p.Type == SentencePieceType.Control)
            {
                // Written out, a special token starts a new segment whose dummy-prefix space is dropped again,
                // mirroring EncodeWithSpecialTokens (which encodes each segment with its own dummy prefix).
                if (!skipSpecialTokens)
                {
                    text.Append(p.Piece);
                    atStart = true;
                }
                continue;
            }
            if (p.Type == SentencePieceType.Unknown)
                surface = _model.UnkSurface;
            else
            {
                var piece = p.Piece;
                if (atStart && _model.AddDummyPrefix && piece.Length > 0 && piece[0] == Space)
                    piece = piece[1..];
                surface = piece.Replace(Space, ' ');
            }
            text.Append(surface);
            if (atStart && surface.Length > 0) atStart = false;
        }
        FlushBytes();
        return text.ToString();
    }
}
