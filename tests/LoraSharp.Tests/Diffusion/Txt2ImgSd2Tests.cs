using LoraSharp.Diffusion;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tests.StableDiffusion;
using LoraSharp.Text;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

public class Txt2ImgSd2Tests
{
    /// <summary>
    /// A1111 ignores "Clip skip" for SD 2.x; kohya applies clip_skip to SD 2.x in training and in its sample images, so
    /// the trainer's sample requests set <see cref="Txt2ImgRequest.ClipSkipOnSd2"/>.
    /// </summary>
    [Fact]
    public void Sd2_clip_skip_is_ignored_like_a1111_unless_the_request_asks_for_kohyas_behaviour()
    {
        var tok = ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer"));
        var sd2 = SyntheticFamilyTests.Sd2();
        var config = sd2 with { TextEncoder = sd2.TextEncoder! with { VocabSize = tok.VocabSize, MaxPositionEmbeddings = tok.MaxLength } };
        manual_seed(9);
        using var model = new StableDiffusionModel(config);
        using var pipe = new Txt2ImgPipeline(model, tok);
        Txt2ImgRequest Request(int skip, bool onSd2) => new()
        {
            Prompt = "a photo of a cat", NegativePrompt = "", Steps = 3, Sampler = "Euler", CfgScale = 3, Seed = 1, Width = 32, Height = 32,
            ClipSkip = skip, ClipSkipOnSd2 = onSd2, Decode = false,
        };
        using var a1111Skip1 = pipe.Generate(Request(1, false));
        using var a1111Skip2 = pipe.Generate(Request(2, false));
        using var kohyaSkip1 = pipe.Generate(Request(1, true));
        using var kohyaSkip2 = pipe.Generate(Request(2, true));
        Assert.Equal(0, Txt2ImgFixture.MaxDiff(a1111Skip1.Latents!, a1111Skip2.Latents!));
        Assert.Equal(0, Txt2ImgFixture.MaxDiff(a1111Skip1.Latents!, kohyaSkip1.Latents!));
        Assert.True(Txt2ImgFixture.MaxDiff(a1111Skip1.Latents!, kohyaSkip2.Latents!) > 1e-4, "clip skip 2 did not change the SD2 conditioning");
        // the infotext names a clip skip only when it was applied
        Assert.DoesNotContain(a1111Skip2.Parameters[0].Settings, kv => kv.Key == "Clip skip");
        Assert.Contains(kohyaSkip2.Parameters[0].Settings, kv => kv.Key == "Clip skip" && kv.Value == "2");
        // and the conditioning is the text encoder's hidden state [-2] + final layer norm
        using var direct = pipe.EncodePrompt("a photo of a cat", clipSkip: 2);
        using var ids = tensor(tok.Encode("a photo of a cat").Select(i => (long)i).ToArray()).unsqueeze(0);
        using var expected = model.TextEncoder!.Encode(ids, 2);
        Assert.True(Txt2ImgFixture.MaxDiff(direct.Context, expected) < 1e-5);
    }
}
