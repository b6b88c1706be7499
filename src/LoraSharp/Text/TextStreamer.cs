namespace LoraSharp.Text;

/// <summary>
/// Turns generated token ids into text pieces as they arrive: each <see cref="Push"/> returns the text the new token
/// adds (decoding the whole generated sequence, so word-initial spaces and multi-token UTF-8 characters come out
/// right; an incomplete character is held back until its last byte arrives).
/// </summary>
public sealed class TextStreamer(ITextTokenizer tokenizer, bool skipSpecialTokens = true)
{
    readonly List<int> _ids = [];
    int _emitted;

    public string Push(int id)
    {
        _ids.Add(id);
        var text = tokenizer.Decode(_ids, skipSpecialTokens);
        if (text.EndsWith('\uFFFD') || text.Length < _emitted) return "";
        var delta = text[_emitted..];
        _emitted = text.Length;
        return delta;
    }

    /// <summary>Everything decoded so far.</summary>
    public string Text => tokenizer.Decode(_ids, skipSpecialTokens);
}
