namespace LoraSharp.Text;

/// <summary>A language-model tokenizer: text ↔ token ids, with its special tokens.</summary>
public interface ITextTokenizer
{
    int VocabSize { get; }
    int? BosId { get; }
    int? EosId { get; }
    int? PadId { get; }

    /// <summary>Special / added tokens by their text (e.g. "&lt;s&gt;", "&lt;|eot_id|&gt;").</summary>
    IReadOnlyDictionary<string, int> SpecialTokens { get; }

    /// <summary>Token ids of plain text: special-token strings inside it are not recognized (they tokenize as text).</summary>
    IReadOnlyList<int> Encode(string text, bool addBos = false, bool addEos = false);

    /// <summary>
    /// Token ids of text that may contain special-token strings (chat templates): each occurrence becomes its id,
    /// the text between is encoded as by <see cref="Encode"/>.
    /// </summary>
    IReadOnlyList<int> EncodeWithSpecialTokens(string text, bool addBos = false, bool addEos = false);

    /// <summary>Text of ids; special tokens are dropped when <paramref name="skipSpecialTokens"/>, else written out.</summary>
    string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true);

    /// <summary>The id of a token's text, or null.</summary>
    int? TokenToId(string token);
}

/// <summary>Splits text on special-token strings (longest match first) for <see cref="ITextTokenizer.EncodeWithSpecialTokens"/>.</summary>
public static class SpecialTokenSplitter
{
    /// <summary>
    /// The ids of <paramref name="text"/> with optional BOS/EOS: plain text goes through <paramref name="encodeInto"/>;
    /// with <paramref name="specials"/>, their strings inside the text become their ids first.
    /// </summary>
    public static IReadOnlyList<int> Encode(string text, Action<string, List<int>> encodeInto, int? bos, int? eos,
        bool addBos, bool addEos, IReadOnlyDictionary<string, int>? specials = null)
    {
        var ids = new List<int>();
        if (addBos && bos is int b) ids.Add(b);
        if (specials is null) encodeInto(text, ids);
        else
            foreach (var (segment, id) in Split(text, specials))
            {
                if (id is int special) ids.Add(special);
                else encodeInto(segment, ids);
            }
        if (addEos && eos is int e) ids.Add(e);
        return ids;
    }

    /// <summary>Segments in order: (text, null) for plain text, (token, id) for a special token.</summary>
    public static IEnumerable<(string Text, int? Id)> Split(string text, IReadOnlyDictionary<string, int> specials)
    {
        var ordered = specials.Keys.Where(k => k.Length > 0).OrderByDescending(k => k.Length).ToList();
        int plainStart = 0, i = 0;
        while (i < text.Length)
        {
            string? match = null;
            foreach (var s in ordered)
                if (string.CompareOrdinal(text, i, s, 0, s.Length) == 0) { match = s; break; }
            if (match is null) { i++; continue; }
            if (i > plainStart) yield return (text[plainStart..i], null);
            yield return (match, specials[match]);
            i += match.Length;
            plainStart = i;
        }
        if (plainStart < text.Length) yield return (text[plainStart..], null);
    }
}
