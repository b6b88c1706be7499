using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraSharp.Text;

/// <summary>
/// Hugging Face <c>tokenizer.json</c> with a byte-level BPE model (Llama 3, Qwen2, GPT-2 style): optional NFC
/// normalizer, regex pre-tokenization (the Split pattern of the file, or GPT-2's when ByteLevel uses its own regex),
/// bytes mapped to printable characters, BPE merges by rank (lowest first, leftmost on ties), <c>ignore_merges</c>
/// (a pre-token that is itself in the vocabulary is one token), and added tokens.
/// Microsoft.ML.Tokenizers' BpeTokenizer has no ignore_merges option (Llama 3 sets it), so this is implemented here.
/// </summary>
public sealed class ByteLevelBpeTokenizer : ITextTokenizer
{
    const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    static readonly char[] ByteToChar = BuildByteToChar();
    static readonly Dictionary<char, byte> CharToByte = ByteToChar.Select((c, b) => (c, b)).ToDictionary(x => x.c, x => (byte)x.b);

    readonly Dictionary<string, int> _vocab;
    readonly string[] _idToToken;
    readonly Dictionary<(string, string), int> _mergeRanks;
    readonly Regex? _split;
    readonly bool _nfc, _ignoreMerges, _addPrefixSpace;
    readonly Dictionary<string, int> _added = new(StringComparer.Ordinal);
    readonly HashSet<int> _specialIds = [];
    readonly Dictionary<string, int[]> _cache = new(StringComparer.Ordinal);

    ByteLevelBpeTokenizer(Dictionary<string, int> vocab, Dictionary<(string, string), int> ranks, Regex? split, bool nfc,
        bool ignoreMerges, bool addPrefixSpace, IEnumerable<(string Content, int Id, bool Special)> added)
    {
        _vocab = vocab;
        _mergeRanks = ranks;
        _split = split;
        _nfc = nfc;
        _ignoreMerges = ignoreMerges;
        _addPrefixSpace = addPrefixSpace;
        foreach (var (content, id, special) in added)
        {
            _added[content] = id;
            if (special) _specialIds.Add(id);
        }
        int size = Math.Max(vocab.Count == 0 ? 0 : vocab.Values.Max() + 1, _added.Count == 0 ? 0 : _added.Values.Max() + 1);
        _idToToken = new string[size];
        foreach (var (token, id) in vocab) _idToToken[id] = token;
        foreach (var (token, id) in _added) _idToToken[id] = token;
    }

    public int VocabSize => _idToToken.Length;
    public int? BosId { get; set; }
    public int? EosId { get; set; }
    public int? PadId { get; set; }
    public IReadOnlyDictionary<string, int> SpecialTokens => _added;

    public int? TokenToId(string token) => _added.TryGetValue(token, out var a) ? a : _vocab.TryGetValue(token, out var id) ? id : null;

    /// <summary>Reads a tokenizer.json; throws <see cref="LoraSharpException"/> when its model is not byte-level BPE.</summary>
    public static ByteLevelBpeTokenizer Load(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("tokenizer.json not found", path);
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new LoraSharpException("invalid JSON: " + e.Message, path, inner: e); }
        using (doc)
            return FromJson(doc.RootElement, path);
    }

    static ByteLevelBpeTokenizer FromJson(JsonElement root, string path)
    {
        if (!root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object)
            throw new LoraSharpException("expected a 'model' object", path, "model");
        var type = model.TryGetProperty("type", out var t) ? t.GetString() : "BPE";
        if (type != "BPE")
            throw new LoraSharpException($"model type '{type}' is not supported (expected BPE)", path, "model.type");

        // Byte-level files have a ByteLevel pre-tokenizer (Llama 3, Qwen2, GPT-2); SentencePiece conversions don't.
        var splits = new List<string>();
        bool byteLevel = false, addPrefixSpace = false;
        if (root.TryGetProperty("pre_tokenizer", out var pre) && pre.ValueKind == JsonValueKind.Object)
            CollectPreTokenizers(pre, splits, ref byteLevel, ref addPrefixSpace, path);
        if (!byteLevel)
            throw new LoraSharpException("only byte-level BPE tokenizer.json files are supported (Llama 3, Qwen2); for SentencePiece models use tokenizer.model", path, "pre_tokenizer");

        bool nfc = root.TryGetProperty("normalizer", out var norm) && norm.ValueKind == JsonValueKind.Object
            && (norm.GetProperty("type").GetString() == "NFC"
                || (norm.TryGetProperty("normalizers", out var list) && list.EnumerateArray().Any(n => n.GetProperty("type").GetString() == "NFC")));

        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var entry in model.GetProperty("vocab").EnumerateObject())
            vocab[entry.Name] = entry.Value.GetInt32();

        var ranks = new Dictionary<(string, string), int>();
        int rank = 0;
        foreach (var merge in model.GetProperty("merges").EnumerateArray())
        {
            (string, string) pair;
            if (merge.ValueKind == JsonValueKind.String)
            {
                var s = merge.GetString()!;
                int space = s.IndexOf(' ');
                if (space <= 0) throw new LoraSharpException($"merge '{s}' is not 'left right'", path, $"model.merges[{rank}]");
                pair = (s[..space], s[(space + 1)..]);
            }
            else
                pair = (merge[0].GetString()!, merge[1].GetString()!);
            ranks.TryAdd(pair, rank++);
        }

        var added = new List<(string, int, bool)>();
        if (root.TryGetProperty("added_tokens", out var addedTokens))
            foreach (var a in addedTokens.EnumerateArray())
                added.Add((a.GetProperty("content").GetString()!, a.GetProperty("id").GetInt32(),
                    a.TryGetProperty("special", out var sp) && sp.GetBoolean()));

        var pattern = splits.Count > 0 ? string.Join("|", splits.Select(s => $"(?:{s})")) : Gpt2Pattern;
        bool ignoreMerges = model.TryGetProperty("ignore_merges", out var im) && im.ValueKind == JsonValueKind.True;
        return new ByteLevelBpeTokenizer(vocab, ranks, new Regex(pattern, RegexOptions.Compiled), nfc, ignoreMerges, addPrefixSpace, added);
    }

    static void CollectPreTokenizers(JsonElement pre, List<string> splits, ref bool byteLevel, ref bool addPrefixSpace, string path)
    {
        switch (pre.GetProperty("type").GetString())
        {
            case "Sequence":
                foreach (var p in pre.GetProperty("pretokenizers").EnumerateArray())
                    CollectPreTokenizers(p, splits, ref byteLevel, ref addPrefixSpace, path);
                break;
            case "Split":
                var pattern = pre.GetProperty("pattern");
                if (pattern.TryGetProperty("Regex", out var regex)) splits.Add(regex.GetString()!);
                else splits.Add(Regex.Escape(pattern.GetProperty("String").GetString()!));
                break;
            case "ByteLevel":
                byteLevel = true;
                addPrefixSpace = pre.TryGetProperty("add_prefix_space", out var aps) && aps.GetBoolean();
                if (pre.TryGetProperty("use_regex", out var ur) && ur.GetBoolean()) splits.Add(Gpt2Pattern);
                break;
            case "Digits":
                splits.Add(pre.TryGetProperty("individual_digits", out var ind) && ind.GetBoolean() ? @"\p{N}" : @"\p{N}+");
                break;
            case var other:
                throw new LoraSharpException($"pre-tokenizer '{other}' is not supported", path, "pre_tokenizer");
        }
    }

    /// <summary>GPT-2's reversible map from the 256 byte values to printable characters.</summary>
    static char[] BuildByteToChar()
    {
        var map = new char[256];
        var printable = new bool[256];
        for (int b = '!'; b <= '~'; b++) printable[b] = true;
        for (int b = 0xA1; b <= 0xAC; b++) printable[b] = true;
        for (int b = 0xAE; b <= 0xFF; b++) printable[b] = true;
        int next = 0;
        for (int b = 0; b < 256; b++)
            map[b] = printable[b] ? (char)b : (char)(256 + next++);
        return map;
    }

    public IReadOnlyList<int> Encode(string text, bool addBos = false, bool addEos = false) =>
        SpecialTokenSplitter.Encode(text, EncodeInto, BosId, EosId, addBos, addEos);

    public IReadOnlyList<int> EncodeWithSpecialTokens(string text, bool addBos = false, bool addEos = false) =>
        SpecialTokenSplitter.Encode(text, EncodeInto, BosId, EosId, addBos, addEos, _added);

    void EncodeInto(string text, List<int> ids)
    {
        if (_nfc) text = text.Normalize(NormalizationForm.FormC);
        if (_addPrefixSpace && text.Length > 0 && text[0] != ' ') text = " " + text;
        foreach (var word in PreTokenize(text))
            ids.AddRange(EncodeWord(word));
    }

    /// <summary>The regex matches and the text between them (HF Split behaviour "Isolated").</summary>
    IEnumerable<string> PreTokenize(string text)
    {
        if (_split is null) { yield return text; yield break; }
        int last = 0;
        for (var m = _split.Match(text); m.Success; m = m.NextMatch())
        {
            if (m.Length == 0) continue;
            if (m.Index > last) yield return text[last..m.Index];
            yield return m.Value;
            last = m.Index + m.Length;
        }
        if (last < text.Length) yield return text[last..];
    }

    int[] EncodeWord(string word)
    {
        lock (_cache)
            if (_cache.TryGetValue(word, out var cached)) return cached;

        var mapped = new StringBuilder();
        foreach (var b in Encoding.UTF8.GetBytes(word)) mapped.Append(ByteToChar[b]);
        var symbolsText = mapped.ToString();
        int[] result;
        if (_ignoreMerges && _vocab.TryGetValue(symbolsText, out var whole))
            result = [whole];
        else
        {
            var symbols = symbolsText.Select(c => c.ToString()).ToList();
            while (symbols.Count > 1)
            {
                int best = -1, bestRank = int.MaxValue;
                for (int i = 0; i + 1 < symbols.Count; i++)
                    if (_mergeRanks.TryGetValue((symbols[i], symbols[i + 1]), out var r) && r < bestRank) { bestRank = r; best = i; }
                if (best < 0) break;
                symbols[best] += symbols[best + 1];
                symbols.RemoveAt(best + 1);
            }
            result = symbols.Select(s => _vocab.TryGetValue(s, out var id) ? id
                : throw new LoraSharpException($"BPE symbol '{s}' is not in the vocabulary (incomplete tokenizer.json)")).ToArray();
        }
        lock (_cache)
            if (_cache.Count < 100_000) _cache[word] = result;
        return result;
    }

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        var text = new StringBuilder();
        var bytes = new List<byte>();
        void Flush()
        {
            if (bytes.Count == 0) return;
            text.Append(Encoding.UTF8.GetString(bytes.ToArray()));
            bytes.Clear();
        }
        foreach (var id in ids)
        {
            if (id < 0 || id >= _idToToken.Length || _idToToken[id] is null)
                throw new ArgumentOutOfRangeException(nameof(ids), id, "token id not in the vocabulary");
            var token = _idToToken[id];
            if (_added.ContainsKey(token))
            {
                if (skipSpecialTokens && _specialIds.Contains(id)) continue;
                Flush();
                text.Append(token);
                continue;
            }
            foreach (var c in token)
                if (CharToByte.TryGetValue(c, out var b)) bytes.Add(b);
        }
        Flush();
        return text.ToString();
    }
}
