using LoraSharp.Diffusion;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tests.StableDiffusion;
using LoraSharp.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

/// <summary>The pipeline on the tiny SDXL model: A1111's SDXL conditioning, time ids, LoRA and block weights.</summary>
public class Txt2ImgSdxlTests
{
    static readonly ClipTokenizer Tok1 = ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer"));
    static readonly ClipTokenizer Tok2 = ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer"), padId: 0);

    static Txt2ImgPipeline Pipeline(StableDiffusionModel model, string? loraDir = null) =>
        new(model, Tok1, Tok2, loraDir is null ? null : LoraLibrary.Open(loraDir), Txt2ImgPipeline.ScheduleOf(SdReference.DiffusersDir("sdxl"), null));

    static Tensor Ids(ClipTokenizer tok, string prompt) =>
        tensor(PromptChunker.Tokenize(tok, prompt).Chunks[0].Tokens.Select(i => (long)i).ToArray()).unsqueeze(0);

    [Fact]
    public void Sdxl_conditioning_is_both_penultimate_states_concatenated_and_the_pooled_projection_of_encoder_2()
    {
        var model = SdReference.Model("sdxl", "diffusers");
        using var pipe = Pipeline(model);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var cond = pipe.EncodePrompt("a photo of a cat", clipSkip: 2);
        using var o1 = model.TextEncoder!.call(Ids(Tok1, "a photo of a cat"));
        using var o2 = model.TextEncoder2!.call(Ids(Tok2, "a photo of a cat"));
        var expected = cat([o1.HiddenStates[^2], o2.HiddenStates[^2]], -1);
        Assert.True(Txt2ImgFixture.MaxDiff(expected, cond.Context) <= 1e-5);
        Assert.True(Txt2ImgFixture.MaxDiff(o2.TextEmbeds!, cond.Pooled!) <= 1e-5);
        // The second tokenizer pads with 0, the first with <|endoftext|>.
        Assert.Equal(0, Ids(Tok2, "a cat")[0, 10].item<long>());
        Assert.Equal(49407, Ids(Tok1, "a cat")[0, 10].item<long>());

        using var emptyNegative = pipe.EncodePrompt("", isNegative: true);
        Assert.Equal(0.0, emptyNegative.Context.abs().max().item<float>());
        Assert.Equal(0.0, emptyNegative.Pooled!.abs().max().item<float>());
        using var emptyPositive = pipe.EncodePrompt("");
        Assert.True(emptyPositive.Context.abs().max().item<float>() > 0);
    }

    [Fact]
    public void Sdxl_generates_with_a_lora_and_sdxl_block_weights()
    {
        using var loras = new TempDir();
        File.Copy(ReferenceData.PathOf("sdxl", "lora", "kohya_lora.safetensors"), loras.File("xl.safetensors"));
        using var model = StableDiffusionModel.FromDiffusers(SdReference.DiffusersDir("sdxl"));
        using var pipe = Pipeline(model, loras.Path);
        var request = new Txt2ImgRequest { Prompt = "a photo of a cat", Steps = 3, Sampler = "Euler a", Seed = 3, Width = 64, Height = 64, CfgScale = 5 };
        using var scope = NewDisposeScope();
        using var plain = pipe.Generate(request);
        using var lora = pipe.Generate(request with { Prompt = "a photo of a cat <lora:xl:1>" });
        using var baseOnly = pipe.Generate(request with { Prompt = "a photo of a cat <lora:xl:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0>" });
        using var teOnly = pipe.Generate(request with { Prompt = "a photo of a cat <lora:xl:1:0>" });
        Assert.Equal(new long[] { 1, 3, 64, 64 }, plain.Images!.shape);
        Assert.True(plain.Images.isfinite().all().item<bool>());
        Assert.True(Txt2ImgFixture.MaxDiff(plain.Images, lora.Images!) > 1e-3);
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(teOnly.Images!, baseOnly.Images!));
        Assert.Throws<LoraSharpException>(() => pipe.Generate(request with { Prompt = "cat <lora:xl:1:lbw=OUTD>" }));
    }
}
